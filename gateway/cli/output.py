"""How every command prints a result: ``-o json``, ``-o yaml``, or ``-o table`` (the default,
for people). Tables are rendered here, by :func:`table`, and nowhere else; an object's
fields by :func:`details`. rich and PyYAML are imported only when they print.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import typer

from gateway.cli.common import GLOBALS

# A column: its header, and the item's key or a function of the item.
Column = tuple[str, "str | Callable[[dict[str, Any]], Any]"]


def machine() -> bool:
    """True when the output is for a program (json or yaml), not a person."""
    return GLOBALS.output in ("json", "yaml")


def print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, sort_keys=True))


def print_yaml(value: Any) -> None:
    import yaml

    typer.echo(yaml.safe_dump(value, sort_keys=True, allow_unicode=True).rstrip("\n"))


def emit(value: Any, human: Callable[[Any], None] | None = None) -> None:
    """Print a result in the chosen output: JSON, YAML, or for people (``human``, or its fields)."""
    if GLOBALS.output == "json":
        print_json(value)
    elif GLOBALS.output == "yaml":
        print_yaml(value)
    elif human is not None:
        human(value)
    else:
        details(value)


def emit_line(value: Any, human: Callable[[Any], str]) -> None:
    """One item of a stream (audit events): a JSON line, a YAML document, or one line for people."""
    if GLOBALS.output == "json":
        typer.echo(json.dumps(value, sort_keys=True))
    elif GLOBALS.output == "yaml":
        typer.echo("---")
        print_yaml(value)
    else:
        typer.echo(human(value))


def cell(value: Any) -> str:
    if value is None or value == "" or value == []:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return ", ".join(cell(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


def table(rows: Iterable[dict[str, Any]], columns: Sequence[Column]) -> None:
    """The one table renderer (rich): a header, then a row per item; nothing for no item.
    Never wraps a cell (ids and URLs stay greppable) and never reads a value as markup."""
    rows = list(rows)
    if not rows:
        return
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    t = Table(box=None, show_edge=False, pad_edge=False, header_style="bold", highlight=False)
    for header, _ in columns:
        t.add_column(header, no_wrap=True, overflow="ignore")
    for row in rows:
        t.add_row(*(Text(cell(get(row) if callable(get) else row.get(get))) for _, get in columns))
    tty = sys.stdout.isatty()
    console = Console(width=None if tty else 100_000, highlight=False, color_system="auto" if tty else None)
    with console.capture() as captured:
        console.print(t)
    for line in captured.get().splitlines():
        typer.echo(line.rstrip())


def details(obj: dict[str, Any], fields: Sequence[Column] | None = None) -> None:
    """One object, a field per line (``label:  value``): ``fields``, or every top-level key."""
    fields = fields or [(k.replace("_", " "), k) for k in obj]
    pairs = [(label, cell(get(obj) if callable(get) else obj.get(get))) for label, get in fields]
    width = max((len(label) for label, _ in pairs), default=0) + 3
    for label, value in pairs:
        typer.echo(f"{label + ':':<{width}}{value}".rstrip())
