"""The ``credgate`` command: the root, its global options, and the one place errors are printed.

Each command group lives in its own module (``secret``, ``backend``, ``connector``, ``cred``
with ``lease``, ``policy``, ``identity`` with issuer/client/admin-key/run, ``login``,
``audit``, ``keys``, ``server`` with serve/db). Server-side commands (``serve``,
``db upgrade``, ``keys generate``) read the settings; client commands talk to a running
gateway over HTTP with ``--addr``/``--token`` (``CREDGATE_ADDR``/``CREDGATE_TOKEN``), or
the token ``credgate login`` kept.

Global options (``--addr``, ``--token``, ``-o/--output json|table|yaml``, ``--json``,
``--version``) are accepted before or after the command: :func:`hoist_globals` moves them
in front of it, where the root callback reads them.

Exit codes: 0 success, 1 a request the gateway refused or could not serve, or a
"no" answer (``policy explain`` deny, a failed ``check``/``verify``), 2 bad usage or
configuration (always one line on stderr).
"""

from __future__ import annotations

import re
import sys
from enum import Enum
from typing import Annotated, Any, NoReturn

import typer
from typer.core import TyperGroup

from gateway.cli.common import GLOBALS, UsageProblem
from gateway.client.errors import GatewayUnreachable, RequestFailed

try:  # typer >= 0.20 carries its own copy of click
    from typer._click import exceptions as click_exc
except ImportError:  # pragma: no cover - older typer on real click
    from click import exceptions as click_exc  # type: ignore[no-redef]

# Every command of the root: its module, the Typer group or the function there, and its
# one-line help. A module is imported (and its commands built) only when its command runs,
# so `credgate --help` builds none of them (tests/gateway/test_cli_tool.py checks the help
# here against the module's own).
COMMANDS: dict[str, tuple[str, str, str]] = {
    "serve": ("server", "serve", "Run the gateway."),
    "secret": ("secret", "app", "Put, read, list and delete secrets."),
    "backend": ("backend", "app", "Register and check secret backends."),
    "connector": ("connector", "app", "Connectors: routes from backend secrets to target services."),
    "cred": ("cred", "cred_app", "Issue short-lived credentials."),
    "exec": ("exec", "exec_app", "Run a command with short-lived credentials in its environment; revoke them when it ends."),
    "unwrap": ("cred", "unwrap", "Exchange a wrap token for its credential (works once; sends no --token)."),
    "lease": ("cred", "lease_app", "Leases: every credential issued, renewed, revoked."),
    "policy": ("policy", "app", "Policies: who may do what, and why a request is allowed or denied."),
    "issuer": ("identity", "issuer_app", "Trusted issuers: identity providers whose JWTs the gateway accepts."),
    "client": ("identity", "client_app", "OAuth2 clients: services that get gateway tokens."),
    "admin-key": ("identity", "admin_key_app", "Admin API keys."),
    "run": ("identity", "run_app", "Run tokens: a subset of your rights for one pipeline run."),
    "login": ("login", "login", "Sign in through the gateway's identity provider (device flow); keeps the token in your profile."),
    "logout": ("login", "logout", "Sign out: revoke the sign-in's token at the gateway, then delete the profile."),
    "whoami": ("login", "whoami", "Who the gateway takes you for: kind, subject, issuer, roles."),
    "audit": ("audit", "app", "The tamper-evident audit trail."),
    "keys": ("keys", "app", "The key-encryption key (KEK): generate, rotate, status; the token-signing key."),
    "db": ("server", "app", "The gateway's store."),
}


def load_command(name: str) -> Any:
    """The click command (or group) ``credgate NAME``, built from its module."""
    import importlib

    module, attr, _ = COMMANDS[name]
    target = getattr(importlib.import_module(f"gateway.cli.{module}"), attr)
    if isinstance(target, typer.Typer):
        command = typer.main.get_group(target)  # a group even with one command (`db upgrade`)
    else:  # a function: a one-command Typer builds it
        single = typer.Typer(add_completion=False, rich_markup_mode=None)
        single.command(name)(target)
        command = typer.main.get_command(single)
    command.name = name
    return command


class LazyGroup(TyperGroup):
    def list_commands(self, ctx: Any) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        return load_command(cmd_name) if cmd_name in COMMANDS else None

    def format_commands(self, ctx: Any, formatter: Any) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, help_) for name, (_, _, help_) in COMMANDS.items()])


app = typer.Typer(
    name="credgate",
    cls=LazyGroup,
    help="credgate: a secrets and service-connector gateway.",
    epilog="Global options go before or after the command: credgate secret list -o json == credgate -o json secret list.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


class Output(str, Enum):
    table = "table"
    json = "json"
    yaml = "yaml"


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"credgate {version('credgate')}")
        except PackageNotFoundError:  # pragma: no cover - running from a source tree
            typer.echo("credgate (not installed)")
        raise typer.Exit()


@app.callback()
def root(
    addr: Annotated[str | None, typer.Option(
        "--addr", envvar="CREDGATE_ADDR", help="Gateway URL [default: http://127.0.0.1:8765].", show_default=False)] = None,
    token: Annotated[str | None, typer.Option(
        "--token", envvar="CREDGATE_TOKEN", help="Bearer token [default: the one `credgate login` kept].",
        show_default=False)] = None,
    output: Annotated[Output, typer.Option(
        "--output", "-o", case_sensitive=False, help="How results are printed: table (for people), json or yaml.")
    ] = Output.table,
    as_json: Annotated[bool, typer.Option("--json", help="Same as -o json.")] = False,
    version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    GLOBALS.addr = addr
    GLOBALS.token = token
    GLOBALS.output = "json" if as_json else output.value


# --- global options before or after the command ----------------------------------

_VALUED = ("--addr", "--token", "--output", "-o")


def _own_version_option(args: list[str]) -> bool:
    """Does the command these arguments name have an option of its own called --version
    (``secret get --version N``)? Then a --version after it is that command's."""
    words = [w for w in args if not w.startswith("-")]
    if not words or words[0] not in COMMANDS:
        return False
    command = load_command(words[0])  # only when --version comes after a command: rare
    for word in words[1:]:
        sub = getattr(command, "commands", {}).get(word)
        if sub is None:
            break
        command = sub
    return any("--version" in getattr(p, "opts", ()) for p in command.params)


def hoist_globals(args: list[str]) -> list[str]:
    """Move the global options found anywhere before ``--`` to the front, where the root
    callback parses them; everything else keeps its order."""
    front: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        name = arg.partition("=")[0]
        if arg == "--":
            rest.extend(args[i:])
            break
        if arg == "--json":
            front.append(arg)
        elif name in _VALUED and "=" in arg and name.startswith("--"):
            front.append(arg)
        elif arg in _VALUED:
            if i + 1 == len(args):
                raise UsageProblem(f"{arg} needs a value (see `credgate --help`)")
            front += [arg, args[i + 1]]
            i += 1
        elif arg.startswith("-o") and not arg.startswith("--") and len(arg) > 2:  # -ojson
            front.append(arg)
        elif arg == "--version" and rest and not _own_version_option(rest):
            front.append(arg)
        else:
            rest.append(arg)
        i += 1
    return front + rest


# --- the one place errors are printed ----------------------------------------------

# The gateway's messages name its REST body and query fields; the CLI's user typed flags.
_CLI_WORDS = [
    (re.compile(r'send "wrap": true'), "pass --wrap"),
    (re.compile(r"(pass )?\?revoke_leases=true"), "pass --revoke-leases"),
    (re.compile(r"\bdefault_ttl_seconds\b"), "--default-ttl"),
    (re.compile(r"\bmax_ttl_seconds\b"), "--max-ttl"),
    (re.compile(r"\btoken_ttl_seconds\b"), "--token-ttl"),
    (re.compile(r"\bttl_seconds\b"), "--ttl"),
    (re.compile(r"\bgrace_seconds\b"), "--grace"),
    (re.compile(r"\binclude_deleted\b"), "--deleted"),
    (re.compile(r'"wrap"'), "--wrap"),
]


def cli_message(message: str) -> str:
    """A gateway message in the CLI's words: ``--wrap``, not ``"wrap": true``."""
    for pattern, words in _CLI_WORDS:
        message = pattern.sub(words, message)
    return message


def _fail(code: int, message: str) -> NoReturn:
    sys.stderr.write(f"credgate: {message}\n")
    sys.exit(code)


def _is_configuration_error(exc: Exception) -> bool:
    errors = sys.modules.get("gateway.errors")  # imported by the server commands only
    return errors is not None and isinstance(exc, errors.ConfigurationError)


def main(argv: list[str] | None = None) -> None:
    try:
        args = hoist_globals(list(sys.argv[1:] if argv is None else argv))
        rv = app(args=args, prog_name="credgate", standalone_mode=False)
    except click_exc.UsageError as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":
            sys.stdout.write(exc.format_message() + "\n")
            sys.exit(0)
        where = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx else ""
        _fail(2, exc.format_message().replace("\n", " ") + where)
    except click_exc.ClickException as exc:
        _fail(2, exc.format_message().replace("\n", " "))
    except typer.Abort:
        _fail(130, "aborted")
    except UsageProblem as exc:
        _fail(2, str(exc))
    except RequestFailed as exc:
        _fail(1, f"{exc.code}: {cli_message(exc.message)}")
    except GatewayUnreachable as exc:
        _fail(1, str(exc))
    except Exception as exc:
        if _is_configuration_error(exc):
            _fail(2, str(exc))
        raise
    if isinstance(rv, int) and rv:
        sys.exit(rv)


if __name__ == "__main__":
    main()
