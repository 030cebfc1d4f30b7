"""What every verb group of the CLI shares: calling the manager, failing in one line,
and printing a human table or JSON (``-o``)."""

from __future__ import annotations

import json
from typing import Any, NoReturn

import click

from ..client import Client, ClientError

OUTPUT = click.option("-o", "--output", "fmt", type=click.Choice(["table", "json"]),
                      default="table", show_default=True, help="Human table or JSON.")


def fail(exc: Exception) -> NoReturn:
    """End the command with ``exc``'s message: one line on stderr, exit 2."""
    raise click.ClickException(str(exc)) from None


def call(method: str, path: str, **kwargs: Any) -> Any:
    """One request to the manager (``STREAMBOSS_URL``); a refusal ends the command."""
    try:
        return Client().request(method, path, **kwargs)
    except ClientError as exc:
        fail(exc)


def table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    """``rows`` as aligned columns under upper-case headings; ``(none)`` when empty."""
    if not rows:
        click.echo("(none)")
        return
    cells = [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    click.echo("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))
               .rstrip())
    for row in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def emit(data: Any, fmt: str, columns: list[str] | None = None) -> None:
    """``data`` as indented JSON, or as a table of ``columns`` for ``-o table``."""
    if fmt == "json" or columns is None:
        click.echo(json.dumps(data, indent=2))
    else:
        table(data if isinstance(data, list) else [data], columns)
