"""The bootstrap admin token: refused at start when it can't work, and never printed
where a log would keep it (a 0600 file instead; only `--dev` prints it)."""

from __future__ import annotations

import logging
import os
import re
import stat
import subprocess
from pathlib import Path

import pytest

from gateway.web.app import create_app
from gateway.errors import ConfigurationError
from gateway.settings import load_settings
from tests.gateway.test_cli import CREDGATE
from tests.services.waiting import clean_env, free_port

pytestmark = pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)

GOOD = "cgt_" + "A1b2-_" * 8


@pytest.mark.parametrize(
    "token,why",
    [
        ("x" * 40, "must start with 'cgt_'"),
        ("Bearer cgt_" + "a" * 40, "must start with 'cgt_'"),
        ("cgt_" + "a" * 20, "32 to 4096 characters"),
        ("cgt_" + "a" * 40 + "\n", "no spaces or newlines"),  # a Secret made from a file with a newline
        ("cgt_" + "a" * 20 + " " + "b" * 20, "no spaces or newlines"),
        ("cgt_" + "a" * 40 + "é", "may hold only"),
    ],
)
def test_a_bootstrap_token_that_cannot_work_is_refused_with_one_line(token: str, why: str, store_url: str) -> None:
    with pytest.raises(ConfigurationError) as exc:
        load_settings(bootstrap_token=token)
    message = str(exc.value)
    assert why in message and "\n" not in message
    assert token.strip() not in message and "a" * 20 not in message  # never the value


def test_serve_refuses_a_token_without_the_prefix_before_starting(tmp_path: Path, store_url: str) -> None:
    res = subprocess.run(
        [CREDGATE, "serve", "--dev", "--data-dir", str(tmp_path), "--port", str(free_port())],
        capture_output=True, text=True, timeout=30,
        env=clean_env(CREDGATE_BOOTSTRAP_TOKEN="not-an-admin-token-" + "q" * 20),
    )
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert "CREDGATE_BOOTSTRAP_TOKEN must start with 'cgt_'" in res.stderr and "q" * 20 not in res.stderr
    assert not (tmp_path / "credgate.db").exists()  # refused before anything was made


def test_a_well_formed_token_is_accepted(store_url: str) -> None:
    assert load_settings(bootstrap_token=GOOD).bootstrap_token.get_secret_value() == GOOD


async def test_generated_token_goes_to_a_private_file_not_stdout(settings_factory, tmp_path: Path, capsys) -> None:
    dest = tmp_path / "secrets" / "bootstrap-token"
    dest.parent.mkdir()
    settings = settings_factory(bootstrap_token=None, bootstrap_token_file=dest, dev=True)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        token = dest.read_text().strip()
        assert stat.S_IMODE(dest.stat().st_mode) == 0o600
        principal = await app.state.runtime.admin_keys.authenticate(token)
        assert principal.roles == {"admin"}
    assert "CREDGATE_TOKEN" not in capsys.readouterr().out and token not in capsys.readouterr().err
    assert sorted(p.name for p in dest.parent.iterdir()) == ["bootstrap-token"]  # no temporary file left
    before = dest.stat().st_mtime_ns
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        pass
    assert dest.stat().st_mtime_ns == before and dest.read_text().strip() == token  # a store with keys: untouched


async def test_an_existing_file_others_can_read_is_refused(settings_factory, tmp_path: Path) -> None:
    dest = tmp_path / "bootstrap-token"
    dest.write_text("old\n")
    os.chmod(dest, 0o644)
    settings = settings_factory(bootstrap_token=None, bootstrap_token_file=dest)
    app = create_app(settings)
    with pytest.raises(ConfigurationError, match="group or others can read it"):
        async with app.router.lifespan_context(app):
            pass
    assert dest.read_text() == "old\n"
    with pytest.raises(ConfigurationError, match="does not exist"):
        async with create_app(settings_factory(bootstrap_token=None, bootstrap_token_file=tmp_path / "no" / "t")
                              ).router.lifespan_context(app):
            pass


def test_serve_refuses_a_wide_token_file_in_one_line(tmp_path: Path, store_url: str) -> None:
    dest = tmp_path / "tok"
    dest.write_text("")
    os.chmod(dest, 0o640)
    res = subprocess.run(
        [CREDGATE, "serve", "--dev", "--data-dir", str(tmp_path / "d"), "--port", str(free_port())],
        capture_output=True, text=True, timeout=30, env=clean_env(CREDGATE_BOOTSTRAP_TOKEN_FILE=str(dest)),
    )
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "mode 640" in res.stderr, res.stderr


def test_a_token_and_a_token_file_together_are_refused(tmp_path: Path, store_url: str) -> None:
    with pytest.raises(ConfigurationError, match="not both"):
        load_settings(bootstrap_token=GOOD, bootstrap_token_file=tmp_path / "t")


async def test_outside_dev_a_generated_token_is_never_printed(settings_factory, capsys, caplog) -> None:
    settings = settings_factory(bootstrap_token=None)
    app = create_app(settings)
    with caplog.at_level(logging.WARNING, logger="credgate"):
        async with app.router.lifespan_context(app):
            assert await app.state.runtime.admin_keys.list() == []  # no key nobody knows
    out = capsys.readouterr()
    assert not re.search(r"cgt_[A-Za-z0-9_-]{20}", out.out + out.err + caplog.text)
    assert "CREDGATE_BOOTSTRAP_TOKEN" in caplog.text
    # The operator sets one and restarts: that token becomes the first admin key.
    app = create_app(settings_factory(bootstrap_token=GOOD))
    async with app.router.lifespan_context(app):
        assert (await app.state.runtime.admin_keys.authenticate(GOOD)).roles == {"admin"}
