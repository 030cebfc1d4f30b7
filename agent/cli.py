"""``stream-agent`` (also ``streamboss agent``): run one operation.

The broker URL comes from ``STREAMBOSS_BROKER_URL`` or the config file, never
from argv: every user of the machine can read a process's arguments.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from .config import (
    DEFAULT_DRAIN_TIMEOUT,
    MODES,
    ConfigError,
    build_config,
    check_consumer_timeout,
    consumer_timeout_limit,
    read_file,
)
from .framing import FRAMINGS
from .isolation import (
    IsolationError,
    child_isolation,
    drop_inherited_privileges,
    make_non_dumpable,
)
from .log_format import setup_logging
from .process import check_program, isolate_children

HELP = """Run one operation: consume INPUT's queue, feed each message to a program,
publish its output to OUTPUT.

The program gets PATH, HOME, LANG, LANGUAGE, LC_*, TZ and TMPDIR from the
agent's environment, the definition's env, PYTHONUNBUFFERED=1 and the names in
STREAMBOSS_PASS_ENV (comma-separated; or the config file's pass_env list),
never the broker URL, a token or AWS credentials. It cannot read the agent's
environment or memory (the agent is not dumpable). STREAMBOSS_CHILD_USER (or
child_user) runs it as that unprivileged user, with that user's group and
HOME; the agent must then be root or hold CAP_SETUID, CAP_SETGID and CAP_KILL.

The broker URL is read from STREAMBOSS_BROKER_URL or the config file's
broker_url (default amqp://guest:guest@127.0.0.1:5672/%2F). SIGTERM stops
consuming, finishes the in-flight messages and exits 0.

Object references (messages with sb-object-url) are read only inside the
object store (STREAMBOSS_OBJECT_STORE or the config file's object_store) and
the URL prefixes of STREAMBOSS_OBJECT_ALLOW (comma-separated, e.g.
s3://media/in,file:///srv/shared; or the config file's object_allow list):
under the directory with no symbolic link followed and only regular files
with a single link, or in the bucket under the prefix. A reference must
declare its size and sha256; it is read no further than its size. Anything
else is dead-lettered with the rule that refused it. With no store
configured, every reference is refused.
"""


@click.command("agent", help=HELP)
@click.option("--config", "config_file", type=click.Path(path_type=Path, dir_okay=False),
              help="TOML or JSON file with broker_url, [operation] and [definition].")
@click.option("--operation", help="Operation name: queue sb.op.NAME, dead letters to NAME.dead.")
@click.option("--input", "input_stream", metavar="STREAM", help="Stream to consume.")
@click.option("--output", "output_stream", metavar="STREAM", help="Stream to publish to.")
@click.option("--definition", "definition_file", type=click.Path(path_type=Path, dir_okay=False),
              help="Process definition JSON (the seed's {\"definition\": {...}} works).")
@click.option("--exec", "command", metavar="COMMAND",
              help="Program and arguments, split like a shell would (no shell is run).")
@click.option("--mode", type=click.Choice(MODES), help="One child per message, or one "
              "long-running child fed framed records.  [default: per-message]")
@click.option("--framing", type=click.Choice(FRAMINGS),
              help="Service-mode record framing on stdin.  [default: line]")
@click.option("--output-framing", type=click.Choice(FRAMINGS),
              help="Service-mode framing on stdout.  [default: same as --framing]")
@click.option("--shell", is_flag=True, default=None, help="Run COMMAND with /bin/sh -c.")
@click.option("--timeout", type=click.FloatRange(min=0.001),
              help="Seconds one record may take.  [default: 60]")
@click.option("--max-attempts", type=click.IntRange(min=1),
              help="Attempts before a message goes to the dead-letter stream.  [default: 3]")
@click.option("--concurrency", type=click.IntRange(min=1),
              help="Per-message children at once.  [default: 2 x CPU count]")
@click.option("--prefetch", type=click.IntRange(min=0),
              help="Unacked messages in flight.  [default: 200 service; per-message "
              "4 x concurrency, at least 16]")
@click.option("--drain-timeout", type=click.FloatRange(min=0),
              help=f"Seconds SIGTERM waits for in-flight messages.  [default: "
              f"{DEFAULT_DRAIN_TIMEOUT:g}]")
@click.option("--output-threshold", type=click.IntRange(min=1), metavar="BYTES",
              help="Per-message outputs larger than this go to the object store "
              "(STREAMBOSS_OBJECT_STORE or the config file's object_store) and are published "
              "as references.  [default: 4 MiB]")
@click.option("--max-message-size", type=click.IntRange(min=1), metavar="BYTES",
              help="The broker's largest message (RabbitMQ's max_message_size); larger outputs "
              "go to the object store, else their input is dead-lettered.  [default: 128 MiB]")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              default="info", show_default=True)
def agent_command(config_file: Path | None, operation: str | None, input_stream: str | None,
                  output_stream: str | None, definition_file: Path | None, command: str | None,
                  mode: str | None, framing: str | None, output_framing: str | None,
                  shell: bool | None, timeout: float | None, max_attempts: int | None,
                  concurrency: int | None, prefetch: int | None, drain_timeout: float | None,
                  output_threshold: int | None, max_message_size: int | None,
                  log_level: str) -> None:
    # First of all: from here on no process of this user (the programs this agent
    # runs, say) can read this one's environment or memory.
    make_non_dumpable()
    setup_logging(log_level)
    try:
        file_values: dict[str, Any] = read_file(config_file) if config_file else {}
        definition: dict[str, Any] = dict(file_values.get("definition") or {})
        if definition_file is not None:
            loaded = read_file(definition_file)
            definition.update(loaded.get("definition", loaded))
        overrides = {
            "exec": command, "mode": mode, "framing": framing,
            "output_framing": output_framing, "shell": shell, "timeout": timeout,
            "max_attempts": max_attempts, "concurrency": concurrency,
        }
        config = build_config(
            operation, input_stream, output_stream,
            {**{k.replace("-", "_"): v for k, v in definition.items()},
             **{k: v for k, v in overrides.items() if v is not None}},
            {**file_values, "definition": {}},
            prefetch=prefetch, drain_timeout=drain_timeout, output_threshold=output_threshold,
            max_message_size=max_message_size,
        )
        check_program(config.definition)
        limit = consumer_timeout_limit()
        children = child_isolation(file_values)
    except (ConfigError, IsolationError) as exc:
        raise click.ClickException(str(exc)) from None
    try:
        check_consumer_timeout(config.definition, limit, config.window, config.concurrency)
    except ConfigError as exc:
        # A warning, not a refusal: the broker may lift its consumer timeout for this
        # queue (RabbitMQ 3.12+, a policy the manager sets) or be configured above it.
        click.echo(f"stream-agent: warning: {exc} (unless the broker's consumer timeout "
                   "for this queue is longer)", err=True)

    isolate_children(children)
    if children.user is not None:
        drop_inherited_privileges()

    from .worker import Agent

    sys.exit(Agent(config).run())


EXIT_USAGE = 2


def run_cli(command: click.Command, prog_name: str) -> None:
    """Run a click command so that every usage or configuration error is one line on
    stderr and exit status 2, the way the rest of streamboss reports bad input."""
    try:
        command.main(prog_name=prog_name, standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as exc:
        context = getattr(exc, "ctx", None)
        name = context.command_path if context is not None else prog_name
        print(f"{name}: error: {exc.format_message()}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def main() -> None:
    """Entry point of the ``stream-agent`` console script."""
    run_cli(agent_command, "stream-agent")
