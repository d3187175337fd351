"""The CLI behaves like one tool (issue 11, item 4): global options before or after the
command, one output option for every result, one table renderer, shell completion, a light
start (no server import), and messages in the CLI's words."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.gateway.test_cli import CREDGATE, Server, server  # noqa: F401 (server: the served-gateway fixture)
from tests.services.waiting import clean_env, free_port

SERVER_MODULES = ("fastapi", "starlette", "sqlalchemy", "uvicorn", "alembic", "pydantic_settings")


def loaded_after(code: str) -> set[str]:
    """The top-level modules a fresh interpreter holds after running ``code``."""
    probe = f"import sys\n{code}\nprint(' '.join(sorted({{m.partition('.')[0] for m in sys.modules}})))"
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True,
                         env=clean_env())
    return set(res.stdout.split())


def test_the_cli_imports_nothing_of_the_server() -> None:
    loaded = loaded_after("import gateway.cli.main")
    assert not loaded & set(SERVER_MODULES), loaded & set(SERVER_MODULES)
    # --help builds no command group: not even the HTTP client is imported
    loaded = loaded_after(
        "import contextlib, io\nfrom gateway.cli.main import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try: main(['--help'])\n    except SystemExit: pass"
    )
    assert not loaded & {*SERVER_MODULES, "httpx", "pydantic"}, loaded


def test_a_client_command_imports_nothing_of_the_server() -> None:
    code = (
        "import contextlib, io\nfrom gateway.cli.main import main\n"
        "with contextlib.redirect_stderr(io.StringIO()):\n"
        f"    try: main(['--addr', 'http://127.0.0.1:{free_port()}', '--token', 'x', 'secret', 'list', 'local/a'])\n"
        "    except SystemExit: pass"
    )
    assert not loaded_after(code) & set(SERVER_MODULES)


def test_root_help_lists_each_command_with_its_modules_own_help() -> None:
    from gateway.cli.main import COMMANDS, load_command

    for name, (_, _, short) in COMMANDS.items():
        command = load_command(name)
        assert command.name == name
        assert (command.help or "").strip().splitlines()[0] == short, name


def test_global_options_are_hoisted_from_anywhere_before_double_dash() -> None:
    from gateway.cli.errors import UsageProblem
    from gateway.cli.main import hoist_globals

    assert hoist_globals(["secret", "get", "local/a", "--json", "--addr", "http://x", "--token=t", "-o", "yaml"]) == [
        "--json", "--addr", "http://x", "--token=t", "-o", "yaml", "secret", "get", "local/a"]
    assert hoist_globals(["backend", "list", "-ojson", "--output=table"]) == ["-ojson", "--output=table", "backend", "list"]
    # the command's own --version stays the command's; anywhere else it is credgate's
    assert hoist_globals(["secret", "get", "local/a", "--version", "2"]) == ["secret", "get", "local/a", "--version", "2"]
    assert hoist_globals(["secret", "list", "--version"]) == ["--version", "secret", "list"]
    assert hoist_globals(["secret", "put", "local/a", "--", "--json"]) == ["secret", "put", "local/a", "--", "--json"]
    with pytest.raises(UsageProblem, match="--addr needs a value"):
        hoist_globals(["backend", "list", "--addr"])


def test_version_before_or_after_the_command() -> None:
    from importlib.metadata import version

    for args in (["--version"], ["backend", "list", "--version"]):
        res = subprocess.run([CREDGATE, *args], capture_output=True, text=True, env=clean_env(), timeout=60)
        assert res.returncode == 0 and res.stdout == f"credgate {version('credgate')}\n", res


def test_output_and_addr_and_token_before_or_after_the_command(server: Server) -> None:
    env = clean_env(CREDGATE_ADDR=f"http://127.0.0.1:{free_port()}")  # nothing there: --addr must win
    runs = [
        ["--addr", server.addr, "--token", server.token, "-o", "json", "backend", "list"],
        ["backend", "list", "--addr", server.addr, "--token", server.token, "--json"],
        ["backend", "--output=json", "list", f"--addr={server.addr}", f"--token={server.token}"],
    ]
    outs = []
    for args in runs:
        res = subprocess.run([CREDGATE, *args], capture_output=True, text=True, env=env, timeout=60)
        assert res.returncode == 0, (args, res.stderr)
        outs.append(json.loads(res.stdout))
    assert outs[0] == outs[1] == outs[2] and "local" in [b["name"] for b in outs[0]["items"]]
    as_yaml = yaml.safe_load(server.cli("backend", "list", "-o", "yaml").stdout)
    assert as_yaml == outs[0]
    # the default is a table, rendered by one helper: a header, then a row per backend
    table = server.cli("backend", "list").stdout.splitlines()
    assert table[0].split() == ["NAME", "TYPE", "BUILT-IN"] and table[1].split() == ["local", "local", "yes"]


def test_every_result_takes_the_output_option(server: Server, tmp_path: Path) -> None:
    server.cli("secret", "put", "local/tool/vendor", "api_key=CANARY-tool")
    server.cli("connector", "add", "toolvendor", "--type", "static", "--auth-method", "static",
               "--secret", "local/tool/vendor", "--resource", "default")
    # connector show: for people by default (it always printed JSON before), JSON or YAML on request
    shown = server.cli("connector", "show", "toolvendor").stdout
    assert "name:" in shown and "toolvendor" in shown and not shown.startswith("{")
    raw = json.loads(server.cli("connector", "show", "toolvendor", "-o", "json").stdout)
    assert raw["name"] == "toolvendor" and yaml.safe_load(server.cli("connector", "show", "toolvendor", "-o", "yaml").stdout) == raw
    # cred issue: the credential formats stay on --format; JSON and YAML come from -o
    issued = json.loads(server.cli("cred", "issue", "toolvendor", "default", "--wrap", "-o", "json").stdout)
    assert issued["wrap_token"] and "CANARY" not in json.dumps(issued)
    issued = yaml.safe_load(server.cli("-o", "yaml", "cred", "issue", "toolvendor", "default", "--wrap").stdout)
    assert issued["wrap_token"] and issued["lease_id"]
    env = server.cli("cred", "issue", "toolvendor", "default", "--wrap", "--format", "env").stdout
    assert "export CREDGATE_WRAP_TOKEN=" in env
    lease = json.loads(server.cli("lease", "show", issued["lease_id"], "--json").stdout)
    assert lease["lease_id"] == issued["lease_id"]
    assert "lease id:" in server.cli("lease", "show", issued["lease_id"]).stdout
    for args in (["keys", "status"], ["whoami"], ["connector", "types"], ["admin-key", "list"], ["policy", "list"],
                 ["lease", "list"], ["audit", "verify"]):
        json.loads(server.cli(*args, "-o", "json").stdout)
        yaml.safe_load(server.cli(*args, "-o", "yaml").stdout)
    server.cli("lease", "revoke", "--connector", "toolvendor")
    server.cli("connector", "rm", "toolvendor")


def test_messages_speak_the_clis_language(server: Server) -> None:
    server.cli("secret", "put", "local/tool/wrapped", "api_key=CANARY-tool-2")
    server.cli("connector", "add", "wraponly", "--type", "static", "--auth-method", "static",
               "--secret", "local/tool/wrapped", "--resource", "default")
    res = server.cli("cred", "issue", "wraponly", "default", check=False)
    assert res.returncode == 1 and res.stderr.startswith("credgate: wrap_required: ") and res.stderr.count("\n") == 1
    assert "--wrap" in res.stderr and '"wrap"' not in res.stderr
    server.cli("cred", "issue", "wraponly", "default", "--wrap")
    res = server.cli("connector", "rm", "wraponly", check=False)
    assert res.returncode == 1 and "--revoke-leases" in res.stderr and "revoke_leases" not in res.stderr
    res = server.cli("connector", "add", "badttl", "--type", "static", "--auth-method", "static",
                     "--secret", "local/tool/wrapped", "--resource", "default", "--default-ttl", "2h", "--max-ttl", "1h",
                     check=False)
    assert res.returncode == 1 and "--default-ttl" in res.stderr and "--max-ttl" in res.stderr
    assert "_ttl_seconds" not in res.stderr
    server.cli("connector", "rm", "wraponly", "--revoke-leases")


def test_cli_message_maps_body_fields_to_flags() -> None:
    from gateway.cli.main import cli_message

    assert cli_message('Connector type static hands out long-lived material only wrapped: send "wrap": true.') == (
        "Connector type static hands out long-lived material only wrapped: pass --wrap.")
    assert cli_message("revoke them first or pass ?revoke_leases=true") == "revoke them first or pass --revoke-leases"
    assert cli_message("ttl_seconds must be at least 60") == "--ttl must be at least 60"
    assert cli_message("Secret local/ttl_seconds_x does not exist.") == "Secret local/ttl_seconds_x does not exist."


def test_tables_never_wrap_and_never_read_markup(capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.cli.output import table

    long = "x" * 300
    table([{"a": long, "b": "[bold]not markup[/bold]"}, {"a": None, "b": ["p", "q"]}], [("A", "a"), ("B", "b")])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[0].split() == ["A", "B"]
    assert lines[1].split() == [long, "[bold]not", "markup[/bold]"] and lines[2].split() == ["-", "p,", "q"]
    table([], [("A", "a")])
    assert capsys.readouterr().out == ""


def test_shell_completion_installs_and_completes(tmp_path: Path) -> None:
    env = clean_env(HOME=str(tmp_path), SHELL="/bin/bash")
    shown = subprocess.run([CREDGATE, "--show-completion", "bash"], capture_output=True, text=True, env=env, timeout=60)
    assert shown.returncode == 0 and "_CREDGATE_COMPLETE=complete_bash" in shown.stdout, shown
    installed = subprocess.run([CREDGATE, "--install-completion", "bash"], capture_output=True, text=True, env=env,
                               timeout=60)
    assert installed.returncode == 0, installed
    assert "credgate" in (tmp_path / ".bashrc").read_text()
    # the script's protocol: the words typed so far in, the candidates out
    env.update(_CREDGATE_COMPLETE="complete_bash", COMP_WORDS="credgate sec", COMP_CWORD="1")
    done = subprocess.run([CREDGATE], capture_output=True, text=True, env=env, timeout=60)
    assert done.stdout.split() == ["secret"], done
    env.update(COMP_WORDS="credgate secret re", COMP_CWORD="2")
    done = subprocess.run([CREDGATE], capture_output=True, text=True, env=env, timeout=60)
    assert done.stdout.split() == ["restore"], done


def test_server_commands_say_what_to_install_when_the_server_is_missing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import builtins

    from gateway.cli.main import main

    real_import = builtins.__import__

    def no_uvicorn(name: str, *args: object, **kwargs: object) -> object:
        if name.partition(".")[0] == "uvicorn":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_uvicorn)
    monkeypatch.delitem(sys.modules, "uvicorn", raising=False)
    with pytest.raises(SystemExit) as exc:
        main(["serve"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1
    assert err.startswith("credgate: `credgate serve` runs the gateway") and "pip install 'credgate[server]'" in err
