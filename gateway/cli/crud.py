"""The list/show/rm pattern that many command groups share, written once.

``add_list``, ``add_show`` and ``add_rm`` register a command on a group: list prints the
collection as one table, show prints one item, rm deletes it and says so. A group with
more to say (filters, flags) writes that command itself with :func:`remove`.
"""

# No `from __future__ import annotations`: typer reads the closures' annotations, which
# name the metavar of each group at run time.

from collections.abc import Callable, Sequence
from typing import Annotated, Any

import typer

from gateway.cli.common import client
from gateway.cli.output import Column, emit, table
from gateway.client.urls import seg


def add_list(group: typer.Typer, path: str, columns: Sequence[Column], help: str) -> None:
    def list_() -> None:
        with client() as c:
            out = c.get(path)
        emit(out, lambda o: table(o["items"], columns))

    list_.__doc__ = help
    group.command("list")(list_)


def add_show(
    group: typer.Typer, path: str, help: str, *, metavar: str = "NAME", human: Callable[[Any], None] | None = None
) -> None:
    def show(name: Annotated[str, typer.Argument(metavar=metavar, show_default=False)]) -> None:
        with client() as c:
            out = c.get(f"{path}/{seg(name)}")
        emit(out, human)

    show.__doc__ = help
    group.command("show")(show)


def remove(path: str, noun: str, name: str, params: dict[str, Any] | None = None) -> None:
    """DELETE one item, then say so (``removed connector cache``)."""
    with client() as c:
        c.request("DELETE", f"{path}/{seg(name)}", params=params)
    typer.echo(f"removed {noun} {name}")


def add_rm(group: typer.Typer, path: str, noun: str, help: str, *, metavar: str = "NAME") -> None:
    def rm(name: Annotated[str, typer.Argument(metavar=metavar, show_default=False)]) -> None:
        remove(path, noun, name)

    rm.__doc__ = help
    group.command("rm")(rm)
