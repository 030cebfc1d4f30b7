"""``streamboss dead``: list, show, requeue and purge an operation's dead letters.

Every verb goes through the manager's API (``/v1/dead``), which reads the
queue ``sb.dead.<operation>`` where the stream ``<operation>.dead`` keeps them.
Dead letters are untrusted input: what they hold is shown with control
characters escaped, so a body cannot drive the terminal.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any

import click

from streamboss.agent.headers import DEAD_STDERR

from ..dead_letters import BODY_LIMIT, SHOW_DEFAULT, SHOW_LIMIT
from .common import OUTPUT, call, emit, fail, table

# C0/C1 controls and the Unicode format characters that reorder or hide text.
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2066-\u2069]")
_UNSAFE_LINE = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2066-\u2069]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _safe(text: str, one_line: bool = True) -> str:
    """``text`` fit for a terminal: controls escaped (newlines too, unless multi-line)."""
    return (_UNSAFE_LINE if one_line else _UNSAFE).sub(_escape, text)


@click.group("dead", short_help="List, show, requeue or purge an operation's dead letters.")
def dead() -> None:
    """Dead letters: messages an operation gave up on.

    An operation's dead letters are published to the stream OPERATION.dead and
    kept in the queue sb.dead.OPERATION until someone requeues or purges them.
    """


@dead.command("list", short_help="Per operation: how many, the oldest, why.")
@click.argument("operation", required=False)
@OUTPUT
def list_dead(operation: str | None, fmt: str) -> None:
    """Per operation (or only OPERATION): dead letters held, the oldest one's time,
    and how many failed by each path (program failure, timeout, agent crash or
    kill, ...). Paths and reasons are counted among the first 2,000 of each."""
    params = {"operation": operation} if operation is not None else {}
    rows = call("GET", "/v1/dead", params=params)
    if fmt == "json":
        emit(rows, fmt)
        return

    def paths(row: dict[str, Any]) -> str:
        text = ", ".join(f"{_safe(path)} {n}" for path, n in row["paths"].items())
        if row["scanned"] < row["count"]:
            text += f" (of the first {row['scanned']})"
        return text or "-"

    table([{"operation": r["operation"], "dead": r["count"], "oldest": r["oldest"] or "-",
            "paths": paths(r)} for r in rows], ["operation", "dead", "oldest", "paths"])


def _header_value(value: Any) -> str:
    return _safe(value if isinstance(value, str) else json.dumps(value))


def _print_letter(letter: dict[str, Any]) -> None:
    click.echo(f"#{letter['position']}  id {_safe(letter['id'] or '-')}")
    click.echo(f"   {_safe(letter['reason'])}")
    facts = [f"path {_safe(letter['path'])}"]
    if letter["attempts"] is not None:
        facts.append(f"attempts {letter['attempts']}")
    if letter["exit_code"] is not None:
        facts.append(f"exit code {letter['exit_code']}")
    facts.append(f"dead at {_safe(letter['dead_at'] or '-')}")
    click.echo("   " + ", ".join(facts))
    click.echo("   headers:")
    for key, value in sorted(letter["headers"].items()):
        if key != DEAD_STDERR:
            click.echo(f"     {_safe(key)}: {_header_value(value)}")
    stderr = letter["headers"].get(DEAD_STDERR)
    if isinstance(stderr, str) and stderr.strip():
        # The program's last words, as it wrote them: lines read better than one escaped.
        click.echo(f"   stderr ({DEAD_STDERR}):")
        for line in stderr.rstrip("\n").splitlines():
            click.echo(f"     {_safe(line, one_line=False)}")
    size = letter["body_size"]
    cut = f", the first {BODY_LIMIT} shown" if letter["body_truncated"] else ""
    if "body" in letter:
        click.echo(f"   body ({size} bytes{cut}):")
        for line in letter["body"].splitlines() or [""]:
            click.echo(f"     {_safe(line, one_line=False)}")
    else:
        click.echo(f"   body ({size} bytes{cut}, binary: -o json gives it as body_base64)")


@dead.command("show", short_help="Headers and bodies of the first N, not consumed.")
@click.argument("operation")
@click.option("--count", type=click.IntRange(1, SHOW_LIMIT), default=SHOW_DEFAULT,
              show_default=True, help="How many, from the oldest.")
@OUTPUT
def show_dead(operation: str, count: int, fmt: str) -> None:
    """Headers and bodies of OPERATION's first --count dead letters, oldest first.

    Nothing is consumed: they stay in the queue, in their order. Bodies longer
    than 1 MiB are cut there (body_size gives the whole length). Text bodies are
    printed with control characters escaped; -o json gives binary ones in base64.
    """
    result = call("GET", f"/v1/dead/{operation}", params={"count": count})
    if fmt == "json":
        emit(result, fmt)
        return
    shown = len(result["messages"])
    click.echo(f"{result['count']} dead letter(s) of {operation} in {result['queue']}"
               + (f"; the first {shown}, left in place:" if shown else ""))
    for letter in result["messages"]:
        click.echo()
        _print_letter(letter)


@dead.command("requeue", short_help="Back into the input queue, attempts reset.")
@click.argument("operation")
@click.option("--count", type=click.IntRange(min=1),
              help="How many, from the oldest [all it holds now].")
@OUTPUT
def requeue_dead(operation: str, count: int | None, fmt: str) -> None:
    """Move OPERATION's dead letters back into its input queue (sb.op.OPERATION),
    oldest first, once its program is fixed.

    Their attempts start again: the attempt count and the dead-letter and retry
    headers are dropped; the id and every other header and property stay. Each
    is removed from the dead letters only after the broker confirmed its copy,
    so an interrupted requeue loses nothing (a copy may at worst be in both).
    """
    params = {"count": count} if count is not None else {}
    result = call("POST", f"/v1/dead/{operation}/requeue", params=params)
    if fmt == "json":
        emit(result, fmt)
        return
    click.echo(f"requeued {result['requeued']} dead letter(s) of {operation} into "
               f"{result['to']}; {result['left']} left in {result['queue']}")


@dead.command("purge", short_help="Delete them for good.")
@click.argument("operation")
@click.option("--yes", is_flag=True, help="Do not ask first.")
@OUTPUT
def purge_dead(operation: str, yes: bool, fmt: str) -> None:
    """Delete every dead letter of OPERATION for good (asks first unless --yes)."""
    if not yes:
        held = call("GET", f"/v1/dead/{operation}", params={"count": 1})["count"]
        if held == 0:
            click.echo(f"no dead letters of {operation} to purge", err=True)
            return
        if not sys.stdin.isatty():
            fail(ValueError(f"purging deletes {held} dead letter(s) of {operation} for good: "
                            "pass --yes to confirm (stdin is not a terminal to ask on)"))
        if not click.confirm(f"Delete the {held} dead letter(s) of {operation} for good?",
                             default=False, err=True):
            click.echo("nothing purged", err=True)
            sys.exit(1)
    result = call("DELETE", f"/v1/dead/{operation}")
    if fmt == "json":
        emit(result, fmt)
        return
    click.echo(f"purged {result['purged']} dead letter(s) of {operation}")
